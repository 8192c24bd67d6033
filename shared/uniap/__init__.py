"""uniap: unified automatic parallelism (UniAP) for Megatron-LM and DeepSpeed.

Data flow: model + cluster + profile -> cost tables (uniap.cost) -> MIQP per subproblem
(uniap.solver) -> Plan (uniap.plan) -> adapters (uniap_megatron, uniap_deepspeed).
"""

__version__ = "0.1.0"
