"""ParallelDims: the parallel degrees, checked against the world size, and the one DeviceMesh."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from eurotrain.configtools import ConfigError
from eurotrain.parallel.config import ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The configured degrees, outermost first: tp innermost so it stays inside a node's fast links."""
MESH_AXES = ("pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp")
"""The mesh's own dimensions: dp_shard split into (dp_shard / ep, ep), "dp_shard" the flattened
pair. ep sits inside cp so that the experts' data mesh (dp_shard_mod_ep x cp) comes before it,
as FSDP's (data, expert) mesh must; without cp, the all-to-all stays among neighbouring ranks."""


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1
    """Expert parallelism: a sub-axis of dp_shard (no ranks of its own)."""
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        degrees = {k: getattr(cfg, k) for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp")}
        fixed = 1
        for v in degrees.values():
            if v != -1:
                fixed *= v
        for k, v in degrees.items():
            if v == -1:
                if world_size % fixed:
                    others = " x ".join(f"parallel.{o}={d}" for o, d in degrees.items() if d > 1)
                    raise ConfigError(
                        f"parallel.{k} = -1 cannot fill the world: {world_size} ranks are not "
                        f"divisible by the product of the other degrees ({others} = {fixed}). "
                        f"Use a layout whose product divides {world_size}, for example "
                        f"{_suggest(world_size)}"
                    )
                degrees[k] = world_size // fixed
        product = 1
        for v in degrees.values():
            product *= v
        if product != world_size:
            layout = " x ".join(f"{k}={v}" for k, v in degrees.items() if v > 1) or "1"
            raise ConfigError(
                f"parallel layout {layout} needs {product} ranks but the job has {world_size}. "
                f"Set one degree to -1 to absorb the rest, or use for example "
                f"{_suggest(world_size)}"
            )
        return cls(world_size=world_size, ep=cfg.ep, **degrees)

    @property
    def dp(self) -> int:
        """Ranks that see different data (replicas x shards)."""
        return self.dp_replicate * self.dp_shard

    def degrees(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in AXES}

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts but different tokens (dp_replicate x dp_shard / ep x
        cp): the experts' FSDP axis."""
        return self.dp_replicate * (self.dp_shard // self.ep) * self.cp

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One named mesh over all axes, with flattened views "dp_shard" (dp_shard_mod_ep x ep),
        "dp" (data), "dp_cp" (FSDP and loss reduction), "dp_shard_cp" (the FSDP shard axis) and
        "dp_shard_mod_ep_cp" (the experts' FSDP shard axis under expert parallelism)."""
        if self._mesh is not None:
            return self._mesh
        assert self.dp_shard % self.ep == 0, "check_layout: ep divides dp_shard"
        sizes = {**self.degrees(), "dp_shard_mod_ep": self.dp_shard // self.ep, "ep": self.ep}
        shape = tuple(sizes[k] for k in MESH_AXES)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
        mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
        mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
        mesh["dp_replicate", "dp_shard_mod_ep", "cp", "ep"]._flatten("dp_cp")
        mesh["dp_shard_mod_ep", "cp", "ep"]._flatten("dp_shard_cp")
        mesh["dp_shard_mod_ep", "cp"]._flatten("dp_shard_mod_ep_cp")
        self._mesh = mesh
        return mesh

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.degrees().items() if v > 1]
        if self.ep > 1:
            parts.append(f"ep={self.ep} (within dp_shard)")
        return " x ".join(parts) or "single rank"


def _suggest(world_size: int) -> str:
    return f"parallel.dp_shard={world_size} (pure FSDP over all {world_size} ranks)"


def dp_rank_and_size(dims: ParallelDims, mesh: DeviceMesh | None) -> tuple[int, int]:
    """This rank's index among the ranks that read different data, and their number."""
    if mesh is None or dims.dp == 1:
        return 0, dims.dp
    return mesh["dp"].get_local_rank(), dims.dp
