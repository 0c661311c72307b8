"""Delta-DiT (Chen et al. 2024, "Delta-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers").

Delta-Cache: a cached range of blocks is replaced by its delta, output - input, stored at the last full
evaluation and added to the range's *current* input (so the skipped blocks still see this step's image,
unlike reusing their output). The front blocks shape outlines and the rear blocks details, so the early
evaluations (i < switch, the paper's b) cache the rear `blocks` blocks and the later ones cache the front
`blocks` blocks. Every `interval`-th evaluation (0, N, 2N, ...) runs in full and refreshes both deltas.

The authors published no code; the defaults are ditk's: N = 2, 3/4 of the blocks, b = half of the
evaluations, which removes 3/8 of the block compute (the paper's "1.6x on 20-step PixArt-alpha" scale).

Inputs, outputs and deltas are block states (`adapters`: one tensor for DiT, [hidden | residual] for Mamba
blocks, the joint [text; music] sequence for FluxMusic). In a U-ViT layout (Diffusion-RWKV, DiS) an in-block
of a cached front range can feed an out-block behind the range through a long skip; such a block returns its
own stored delta on the range's current input (input + its output - range input at the last full evaluation),
as the range's last block does, since its output is read outside the range (passing the range input on would
hand the out-block the wrong skip tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from ..registry import CACHE_POLICIES
from .adapters import BlockIO, long_skips
from .base import CachePolicy, model_blocks


@dataclass
class DeltaDiTConfig:
    interval: int = 2  # N: one full evaluation every N
    blocks: Optional[int] = None  # number of blocks in each cached range (default: 3/4 of the depth)
    switch: Optional[int] = None  # b: evaluations before it cache the rear blocks, from it the front (default: half)


class DeltaDiT(CachePolicy):
    name = "delta-dit"

    def __init__(self, cfg: DeltaDiTConfig):
        super().__init__(cfg)
        if cfg.interval < 1:
            raise ConfigError(f"delta-dit interval must be >= 1, got {cfg.interval}")

    def units(self, model):
        return [(f"blocks.{i}", block) for i, block in enumerate(model_blocks(model))]

    def _ranges(self, depth: int, num_evals: int) -> tuple[int, int, range, range]:
        k = self.cfg.blocks if self.cfg.blocks is not None else max(1, round(0.75 * depth))
        b = self.cfg.switch if self.cfg.switch is not None else num_evals // 2
        return k, b, range(0, k), range(depth - k, depth)

    def validate(self, model, num_evals):
        depth = len(model_blocks(model))
        k = self.cfg.blocks
        if k is not None and not 1 <= k <= depth:
            raise ConfigError(f"delta-dit blocks={k} must be between 1 and the model's depth {depth}")

    def init_state(self, session):
        return {"inputs": {}, "deltas": {}, "now": None}

    def install(self, session, units):
        k, b, front, rear = self._ranges(len(units), session.num_evals)
        skips = long_skips(session.model)
        # Blocks of a range whose output a block outside the range reads through a long skip (U-ViT in-blocks
        # of a front range): when the range is cached they return their own delta, not the range's input.
        escaping = {key: {s for c, s in skips.items() if s in rng and c not in rng}
                    for key, rng in (("front", front), ("rear", rear))}
        session.plan = {"switch": b, "front": front, "rear": rear, "escaping": escaping}
        for j, (name, block) in enumerate(units):
            session.patch(block, self._forward(session, j, name, BlockIO(block), block.forward))

    def _forward(self, session, j, name, io, original):
        plan = session.plan
        interval = self.cfg.interval

        def forward(*args, **kwargs):
            i, st = session.step, session.state
            if i % interval == 0:  # full: run the block, record both ranges' input states and deltas
                for key in ("front", "rear"):
                    if j == plan[key].start:
                        st["inputs"][key] = io.read_in(args, kwargs)
                out = original(*args, **kwargs)
                for key in ("front", "rear"):
                    rng = plan[key]
                    if j in rng and (j == rng.stop - 1 or j in plan["escaping"][key]):
                        st["deltas"][key, j] = io.read_out(out, args, kwargs) - st["inputs"][key]
                if i == 0:
                    io.read_out(out, args, kwargs)  # refuses, once, a block whose output it cannot add up
                session.mark(name, False)
                return out
            key = "rear" if i < plan["switch"] else "front"
            rng = plan[key]
            if j not in rng:
                session.mark(name, False)
                return original(*args, **kwargs)
            session.mark(name, True)
            if j == rng.start:
                st["now"] = io.read_in(args, kwargs)  # the range's input state at this evaluation
            # The range's last block (and an escaping source) stand in with input + stored delta; the others
            # pass the range's input state on.
            delta = st["deltas"].get((key, j))
            return io.write(st["now"] if delta is None else st["now"] + delta, args, kwargs)

        return forward


@CACHE_POLICIES.register("delta-dit", config=DeltaDiTConfig,
                         help="Delta-DiT: reuse block-range deltas, rear blocks early and front blocks late")
def build_delta_dit(cfg: DeltaDiTConfig) -> DeltaDiT:
    return DeltaDiT(cfg)
