"""Random small planning instances (chains, runs of identical layers, DAGs) for solver tests."""

from __future__ import annotations

import random
from dataclasses import replace

from uniap.cluster.spec import ClusterSpec
from uniap.cost.model import CostModel
from uniap.cost.strategy import Capability, capability_for
from uniap.cost.tables import build_subproblem
from uniap.model.graph import CHAIN, SKIP, Edge, Layer, LayerGraph
from uniap.model.spec import TrainingSpec

# A reduced generic target (ZeRO 0/3, recompute none/full) keeps exhaustive search small.
SMALL_GENERIC = Capability(
    name="small-generic", description="test", zero_stages=(0, 3), recompute_modes=("none", "full")
)
# A 512-token sequence: targets that run context parallelism (Megatron) may split it over 2 or 4 ranks.
DIVISIBILITY = {"num_attention_heads": 8, "num_query_groups": 8, "ffn_hidden_size": 1024, "sequence_length": 512}


def random_layer(rng: random.Random, name: str, kind: str, signature: str | None = None) -> Layer:
    h = rng.choice([256, 512, 1024])
    return Layer(
        name=name,
        kind=kind,
        signature=signature or f"{name}-{rng.random()}",
        params_tp=rng.randint(1, 50) * 10**6,
        params_rep=rng.randint(0, 10) * 10**4,
        flops_fwd=rng.uniform(1e9, 5e10),
        act_split=rng.uniform(1e5, 3e7),
        act_seq=rng.uniform(1e5, 1e7),
        act_scores=rng.uniform(0, 1e7),
        input_bytes=2 * h * 512,
        output_bytes=2 * h * 512,
        tp_comm_bytes=rng.uniform(1e5, 1e7),
        kv_bytes=rng.uniform(1e5, 1e7) if kind == "transformer" else 0.0,
    )


def random_graph(rng: random.Random, shape: str) -> LayerGraph:
    """shape: 'chain' (distinct layers), 'run' (identical layers), 'dag' (T5-like skip edges), or
    'branch' (one layer feeding two)."""
    layers = [random_layer(rng, "emb", "embedding")]
    edges: list[Edge] = []

    def chain(layer: Layer) -> None:
        layers.append(layer)
        edges.append(Edge(len(layers) - 2, len(layers) - 1, CHAIN))

    if shape == "run":
        base = random_layer(rng, "L", "transformer", "same")
        for i in range(rng.randint(2, 3)):
            chain(Layer(**{**base.__dict__, "name": f"L{i}"}))
    elif shape == "chain":
        for i in range(rng.randint(1, 3)):
            chain(random_layer(rng, f"L{i}", "transformer"))
    elif shape == "dag":
        chain(random_layer(rng, "enc", "transformer"))
        layers.append(random_layer(rng, "dec_emb", "embedding"))
        base = random_layer(rng, "D", "cross_transformer", "dec")
        for i in range(rng.randint(1, 2)):
            chain(Layer(**{**base.__dict__, "name": f"D{i}"}))
            edges.append(Edge(1, len(layers) - 1, SKIP))
    else:  # branch: emb -> a -> {b, c} -> head
        chain(random_layer(rng, "a", "transformer"))
        layers.append(random_layer(rng, "b", "transformer"))
        edges.append(Edge(1, 2, CHAIN))
        layers.append(random_layer(rng, "c", "transformer"))
        edges.append(Edge(1, 3, CHAIN))
        edges.append(Edge(2, 3, SKIP))
    chain(random_layer(rng, "head", "head"))
    return LayerGraph(layers, edges, divisibility=DIVISIBILITY)


def small_cluster(memory_gib: float, nodes: int = 1, gpus_per_node: int = 1, **hosts) -> ClusterSpec:
    """A made-up cluster small enough for exhaustive search: 100 TFLOP/s GPUs of `memory_gib`, NVLink at 100 GB/s
    and a 10 GB/s network; `hosts`: its host fields (host_memory_gib, host_link_bandwidth_gbps)."""
    return ClusterSpec(
        name="test",
        num_nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_name="test",
        gpu_memory_gib=memory_gib,
        peak_tflops=100,
        hbm_bandwidth_gbps=1000,
        intra_node_bandwidth_gbps=100,
        inter_node_bandwidth_gbps=10,
        reserved_memory_gib=0.5,
        **hosts,
    )


def random_instance(seed: int):
    """(subproblem, description) for one random graph, cluster, memory limit, target, deg and c."""
    rng = random.Random(seed)
    shape = ["chain", "run", "dag", "branch"][seed % 4]
    graph = random_graph(rng, shape)
    nodes, gpn = rng.choice([(1, 2), (2, 2), (1, 4), (2, 1)])
    memory = rng.choice([1.0, 1.5, 2.0, 3.0, 5.0, 40.0])
    cluster = small_cluster(memory, nodes, gpn)
    training = TrainingSpec(global_batch_size=8, seq_length=512)
    capability = rng.choice([SMALL_GENERIC, capability_for("megatron"), capability_for("deepspeed")])
    degs = [d for d in (1, 2, 4) if cluster.num_gpus % d == 0 and d <= len(graph.layers)]
    deg = rng.choice(degs)
    c = rng.choice([1, 2, 4])
    # Drawn last, so the instances above stay what they were: hosts that DeepSpeed may offload to, or none.
    cluster = replace(cluster, host_memory_gib=rng.choice([None, 4.0, 64.0]))
    sub = build_subproblem(graph, cluster, training, capability, CostModel(cluster, training), deg, c)
    what = (
        f"seed={seed} shape={shape} target={capability.name} gpus={cluster.num_gpus} mem={memory} "
        f"host={cluster.host_memory_gib} deg={deg} c={c}"
    )
    return sub, what
