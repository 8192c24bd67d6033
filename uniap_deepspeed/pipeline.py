"""Impose a plan's layer -> stage split on a DeepSpeed PipelineModule.

DeepSpeed has no option for an explicit partition (its methods are uniform, parameters, type:regex),
so `PlannedPipelineModule` overrides `_partition_layers`, as DeepSpeed's own DualPipeVModule does.
The plan's layers are mapped onto the user's LayerSpec list: entries whose class name matches
`layer_type` (a regex, as in DeepSpeed's `type:` method) are the plan's transformer layers, in order;
entries before the first of them go with the plan's first layer (the embedding), entries after the
last with the plan's last layer (the head), others with the next transformer layer.
"""

from __future__ import annotations

import logging
import re

from deepspeed.pipe import PipelineModule

from uniap.errors import SpecError
from uniap.model.graph import TRANSFORMER_KINDS
from uniap.plan import Plan

log = logging.getLogger(__name__)


# Class names of transformer layers: uniap's and DeepSpeed examples' (TransformerLayer, ...Block), Megatron's and
# Hugging Face's (LlamaDecoderLayer, BertLayer, RobertaLayer, ViTLayer, GPT2Block, T5Block), but no embedding,
# head, norm, pooler or loss module (LayerNorm, BertEmbeddings, ...).
DEFAULT_LAYER_TYPE = r"^(?!.*(?:embed|head|norm|pool|output|loss)).*(?:transformer|block|layer$)"


def entry_stages(plan: Plan, is_transformer: list[bool], names: list[str] | None = None) -> list[int]:
    """The stage of each entry of the user's layer list under `plan` (raises SpecError if they differ)."""
    stages = [lp.stage for lp in plan.layers if lp.kind in TRANSFORMER_KINDS]
    matched = sum(is_transformer)
    if matched != len(stages):
        seen = f" (the list: {_describe(names, is_transformer)})" if names else ""
        raise SpecError(
            f"the plan has {len(stages)} transformer layers but {matched} entries of the layer list "
            f"match the layer type{seen}",
            "pass layer_type= a regex matching exactly the transformer layers' class names",
        )
    out: list[int | None] = []
    k = 0
    for flag in is_transformer:
        out.append(stages[k] if flag else None)
        k += flag
    first = next((i for i, f in enumerate(is_transformer) if f), len(out))
    last = max((i for i, f in enumerate(is_transformer) if f), default=-1)
    for i in range(len(out)):
        if out[i] is None:
            if i < first:
                out[i] = plan.layers[0].stage
            elif i > last:
                out[i] = plan.layers[-1].stage
    for i in reversed(range(len(out))):
        if out[i] is None:
            out[i] = out[i + 1]
    return out


def parts_from_stages(stages: list[int], num_stages: int) -> list[int]:
    """DeepSpeed's `parts`: num_stages + 1 boundaries of contiguous, non-empty stages."""
    if any(b < a for a, b in zip(stages, stages[1:])) or set(stages) != set(range(num_stages)):
        raise SpecError(
            f"the layer list cannot follow the plan's split (stages per entry {stages})",
            "order the layer list like the model: embedding, transformer layers, head",
        )
    return [stages.index(s) for s in range(num_stages)] + [len(stages)]


class PlannedPipelineModule(PipelineModule):
    """A PipelineModule whose stages hold exactly the layers the plan puts there.

    `PlannedPipelineModule(layers, plan, loss_fn=..., layer_type="transformer|block")`; the other
    keyword arguments are PipelineModule's. The number of stages is the plan's pipeline degree."""

    def __init__(self, layers, plan: Plan, layer_type: str = DEFAULT_LAYER_TYPE, **kwargs):
        if "num_stages" in kwargs or "topology" in kwargs:
            raise SpecError("PlannedPipelineModule takes its number of stages from the plan")
        method = kwargs.pop("partition_method", None)  # kept from code written for PipelineModule
        if method is not None:
            log.warning("partition_method=%r ignored: the plan's split places the layers", method)
        self._uniap_plan = plan
        self._uniap_layer_type = layer_type
        if plan.uniform_strategy is not None and plan.uniform_strategy.recompute == "full":
            kwargs.setdefault("activation_checkpoint_interval", 1)
        super().__init__(layers=layers, num_stages=plan.pipeline_degree, partition_method="uniap", **kwargs)

    def _partition_layers(self, method="uniap"):
        pattern = re.compile(self._uniap_layer_type, re.IGNORECASE)
        names = [_entry_name(spec) for spec in self._layer_specs]
        is_transformer = [bool(pattern.search(name)) for name in names]
        self.parts = parts_from_stages(entry_stages(self._uniap_plan, is_transformer, names), self.num_stages)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def _describe(names: list[str], matched: list[bool]) -> str:
    """'EmbeddingPipe, BertLayer x24 (matched), HeadPipe': runs of equal names, matched ones marked."""
    runs: list[list] = []
    for name, hit in zip(names, matched):
        if runs and runs[-1][0] == name:
            runs[-1][2] += 1
        else:
            runs.append([name, hit, 1])
    return ", ".join(f"{n}{f' x{c}' if c > 1 else ''}{' (matched)' if hit else ''}" for n, hit, c in runs)


def _entry_name(spec) -> str:
    typename = getattr(spec, "typename", None)
    if typename is not None:
        return typename.__name__
    return type(spec).__name__ if not isinstance(spec, type) else spec.__name__
