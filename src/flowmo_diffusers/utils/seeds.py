"""Seeds derived from several integers (seed, process, epoch, batch, slot, image index, ...): one home for all."""

import numpy as np
import torch


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (numpy's ``SeedSequence`` does the mixing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(*values: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*values)``."""
    return torch.Generator(device).manual_seed(derive_seed(*values))


__all__ = ["derive_seed", "seeded_generator"]
