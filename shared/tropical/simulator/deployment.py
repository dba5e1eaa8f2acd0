"""A deployment file: the cluster to simulate as worker groups, each with its own profile, parallelism and KV.

`tropical sim --cluster FILE` reads one (TOML):

    model = "opt-13b"              # a model the published profiles cover
    hardware = "a100-80g"
    kv_bytes_per_token = 819200    # optional for models of known shape: every layer's K and V, fp16

    [link]                         # optional: one worker-to-worker KV transfer within a node
    bandwidth_gb_s = 150           # per GPU pair; a transfer gets it times the narrower side's TP degree
    latency_ms = 1

    [internode]                    # optional: the same between groups on different nodes
    bandwidth_gb_s = 25            # per GPU pair (a DGX-A100: one 200 Gb/s InfiniBand NIC per GPU)
    latency_ms = 1

    [host]                         # optional: where a preempted decode's KV goes with `batcher.preemption=swap`
    bandwidth_gb_s = 25            # per GPU (PCIe 4.0 x16)

    [[group]]
    role = "prefill"               # prefill, decode, multiplex or colocated
    count = 1                      # instances
    tensor_parallel = 2
    pipeline_parallel = 1          # stages; an instance of P stages runs P micro-batches side by side (`WorkerGroup`)
    profile = "distserve"          # optional: which published profile (distserve, distserve-vllm, splitwise, vidur, sarathi)
    kv_capacity = 132000           # one instance's; optional where the profile's source records it (DistServe's table)
    step_overhead_ms = 0           # optional: the engine's own work per step, beyond the profile's forward pass
    sequence_overhead_ms = 0       # optional: ... and per decode in a step (`LatencyModel.with_overhead`)
    node = "a"                     # optional: groups on different nodes move KV over [internode]

    [[group]]
    role = "decode"
    count = 1
    tensor_parallel = 1

A DistServe deployment of prefill at TP 2 and decode at TP 1 is two groups.
A preset's hardware is a one-group file in `presets/` (`WorkerPool`), whose
workers each policy gives their roles.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tropical.latency.model import LatencyModel
from tropical.latency.profiles import canonical_model, distserve_kv_capacity, distserve_model, load_profile, stage_hop
from tropical.policies.records import Role
from tropical.simulator.cluster import A100_NVLINK_BYTES_PER_S, HIDDEN, PCIE4_BYTES_PER_S, ClusterSpec, Link, WorkerGroup, model_kv_bytes

GROUP_KEYS = {"role", "count", "tensor_parallel", "pipeline_parallel", "profile", "kv_capacity", "step_overhead_ms", "sequence_overhead_ms", "node"}
TOP_KEYS = {"model", "hardware", "kv_bytes_per_token", "link", "internode", "host", "group"}
LINK_KEYS = {"bandwidth_gb_s", "latency_ms"}
INTERNODE_BYTES_PER_S = 25e9  # per GPU pair: a DGX-A100 gives each GPU its own 200 Gb/s InfiniBand NIC


T = TypeVar("T")


class DeploymentError(ValueError):
    """A deployment file that cannot be simulated; the message names the file and the problem."""


PRESETS = Path(__file__).resolve().parent / "presets"  # the presets' hardware, one `WorkerPool` file each


@dataclass(frozen=True)
class WorkerPool:
    """A deployment of one group of interchangeable workers, whose roles each policy decides: a preset's hardware.

    The file is an ordinary deployment file with a single group of
    single-stage instances; its role is a placeholder (`Setting.cluster`
    gives the workers the policy's roles at the split being tried).
    """

    model: str
    hardware: str
    profile: str | None
    tensor_parallel: int
    workers: int
    kv_capacity: int
    kv_bytes_per_token: int


def load_deployment(path: str | Path) -> ClusterSpec:
    path = Path(path)
    return _checked(path, cluster_of, _read(path))


def load_pool(path: str | Path) -> WorkerPool:
    path = Path(path)
    return _checked(path, pool_of, _read(path))


def pool_of(raw: dict[str, Any]) -> WorkerPool:
    """The pool a one-group deployment file's content describes."""
    cluster = cluster_of(raw)
    if len(cluster.groups) != 1 or cluster.groups[0].pipeline_parallel != 1:
        raise ValueError("a pool of workers is one [[group]] of single-stage instances")
    (group,) = cluster.groups
    profile = raw["group"][0].get("profile")
    return WorkerPool(
        model=canonical_model(str(raw["model"])),
        hardware=str(raw.get("hardware", "a100-80g")),
        profile=None if profile is None else str(profile),
        tensor_parallel=group.tensor_parallel,
        workers=group.count,
        kv_capacity=group.kv_capacity,
        kv_bytes_per_token=cluster.kv_bytes_per_token,
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeploymentError(f"{path}: not TOML: {exc}") from None


def _checked(path: Path, build: Callable[[dict[str, Any]], T], raw: dict[str, Any]) -> T:
    try:
        return build(raw)
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DeploymentError(f"{path}: {problem}") from None


def _known(table: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
    """`table` itself, once it is sure to hold no key but `keys` (`where` names it in the refusal)."""
    unknown = set(table) - keys
    if unknown:
        raise ValueError(f"{where}unknown keys {', '.join(sorted(unknown))}")
    return table


def cluster_of(raw: dict[str, Any]) -> ClusterSpec:
    """The cluster a deployment file's content describes (ValueError, KeyError or TypeError when it is not one)."""
    _known(raw, TOP_KEYS, "")
    model = canonical_model(str(raw["model"]))
    hardware = str(raw.get("hardware", "a100-80g"))
    groups = [_group(model, hardware, g) for g in raw["group"]]
    if not groups:
        raise ValueError("no [[group]] of workers")
    kv_bytes = int(raw["kv_bytes_per_token"]) if "kv_bytes_per_token" in raw else model_kv_bytes(model)
    if kv_bytes <= 0:
        raise ValueError("kv_bytes_per_token must be positive")
    link = _link(raw.get("link", {}), A100_NVLINK_BYTES_PER_S, "[link]")
    internode = _link(raw.get("internode", {}), INTERNODE_BYTES_PER_S, "[internode]")
    host = _known(raw.get("host", {}), {"bandwidth_gb_s"}, "[host] has ")
    host_bandwidth = float(host.get("bandwidth_gb_s", PCIE4_BYTES_PER_S / 1e9)) * 1e9
    return ClusterSpec.of_groups(groups, kv_bytes_per_token=kv_bytes, link=link, internode=internode, host_bandwidth=host_bandwidth)


def _link(table: dict[str, Any], default_bandwidth: float, name: str) -> Link:
    _known(table, LINK_KEYS, f"{name} has ")
    try:
        return Link(float(table.get("bandwidth_gb_s", default_bandwidth / 1e9)) * 1e9, float(table.get("latency_ms", 1.0)) / 1000.0)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _group(model: str, hardware: str, g: dict[str, Any]) -> WorkerGroup:
    _known(g, GROUP_KEYS, "a group has ")
    role = Role(str(g["role"]))
    tp, pp = int(g.get("tensor_parallel", 1)), int(g.get("pipeline_parallel", 1))
    if tp < 1 or pp < 1:
        raise ValueError(f"the {role} group's tensor_parallel and pipeline_parallel must be at least 1")
    profile = g.get("profile")
    latency = profile_model(model, hardware, tp, None if profile is None else str(profile))
    step, per_sequence = float(g.get("step_overhead_ms", 0.0)), float(g.get("sequence_overhead_ms", 0.0))
    if "kv_capacity" in g:
        capacity = int(g["kv_capacity"])
    elif latency.name.endswith((":distserve", ":distserve-vllm")):
        capacity = distserve_kv_capacity(model, tp, pp)
    else:
        raise ValueError(f"give the {role} group's kv_capacity: {latency.name}'s source records none")
    overhead = latency.with_overhead(step / 1000.0, per_sequence / 1000.0) if step or per_sequence else latency
    return WorkerGroup(role, int(g.get("count", 1)), _pipelined(overhead, model, hardware, pp), capacity, tp, pp, str(g.get("node", "")))


def _pipelined(latency: LatencyModel, model: str, hardware: str, stages: int) -> LatencyModel:
    """One micro-batch's pass through `stages` stages: the step, plus stages − 1 sends of its activations."""
    if stages == 1:
        return latency
    if model not in HIDDEN:
        raise ValueError(f"{model}'s activation width is not known, so its pipeline stages cannot be timed")
    hop_latency, per_byte = stage_hop(hardware)
    return latency.with_stage_hops(stages - 1, hop_latency, per_byte * HIDDEN[model] * 2)  # fp16 activations


def profile_model(model: str, hardware: str, tensor_parallel: int, source: str | None = None) -> LatencyModel:
    """The published profile `source` names (or the preferred one for the setup): `load_profile`'s sources, and
    'distserve-vllm', DistServe's profile of vLLM."""
    if source == "distserve-vllm":  # DistServe's profile of vLLM's kernels
        return distserve_model(model, tensor_parallel, engine="vllm")
    return load_profile(model, hardware, tensor_parallel, source=source)
