"""Memory plan of one Wan2.2-T2V-A14B (+ Stand-In) DiT replica: which expert residency fits.

Pure arithmetic on top of `benchmarks.gpu_plan.memory_estimate` (the Wan2.1-14B rank, per GPU):
the two experts have the 14B architecture each, so per rank

- `resident`: 2 × weights + one identity cache (an expert's cache is built on its first step
  and the high expert's is dropped at the switch) + text + activations + runtime;
- `offload`: 1 × weights (the device slot) + the same rest; the host holds both experts' weights
  in pinned memory (2 × weights per rank), and each request moves one expert's weights in and
  out of the slot (two host-to-device copies per request).

    python -m benchmarks.wan22_plan      # the table in cluster/README.md ("Wan2.2 A14B")
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from benchmarks.gpu_plan import GB, memory_estimate
from standin.presets import dit_preset

__all__ = ["GPU_SIZES_GB", "Wan22Memory", "choose_residency", "wan22_memory", "wan22_table"]

GPU_SIZES_GB = (80, 141)
# "fits" leaves this fraction of the GPU free (as the Wan2.1 table)
HEADROOM = 0.10
# Host-to-device bandwidth from pinned memory, GB/s, for the swap time (PCIe 5 x16 ≈ 50 in practice;
# an assumption, not measured here)
H2D_GBPS = 50.0


@dataclass(frozen=True)
class Wan22Memory:
    """Per-rank GB of one replica (bf16, 81 frames, 1,024 identity tokens)."""

    size: str
    sp: int
    expert_weights: float
    identity_cache: float
    text: float
    activations: float
    runtime: float

    def total(self, residency: str) -> float:
        experts = 2 if residency == "resident" else 1
        rest = self.identity_cache + self.text + self.activations + self.runtime
        return experts * self.expert_weights + rest

    def host_pinned(self, residency: str) -> float:
        """Pinned host memory per rank (both experts' weights under offload)."""
        return 2 * self.expert_weights if residency == "offload" else 0.0

    def swap_seconds(self) -> float:
        """One expert's weights over the host-to-device link."""
        return self.expert_weights / H2D_GBPS


def wan22_memory(size: str, sp: int) -> Wan22Memory:
    est = memory_estimate(dit_preset("wan2.2-t2v-a14b"), size, sp)
    return Wan22Memory(
        size,
        sp,
        est.weights / GB,
        est.identity_cache / GB,
        est.text / GB,
        est.activations / GB,
        est.runtime / GB,
    )


def fits(total_gb: float, gpu_gb: int) -> bool:
    return total_gb <= gpu_gb * (1 - HEADROOM)


def choose_residency(size: str, sp: int, gpu_gb: int) -> str | None:
    """`resident` when both experts fit, else `offload` when one does, else None."""
    mem = wan22_memory(size, sp)
    for residency in ("resident", "offload"):
        if fits(mem.total(residency), gpu_gb):
            return residency
    return None


def wan22_table(sizes: tuple[str, ...] = ("480p", "720p"), sps: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """The markdown table: per size and SP degree, both residencies and the choice per GPU."""
    head = (
        "| size | SP | one expert | identity cache | activations | resident (2 experts) | offload (1 slot) "
        "| 80 GB GPU | 141 GB GPU |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for size in sizes:
        for sp in sps:
            m = wan22_memory(size, sp)
            choice = [choose_residency(size, sp, g) or "does not fit" for g in GPU_SIZES_GB]
            rows.append(
                f"| {size} | {sp} | {m.expert_weights:.1f} | {m.identity_cache:.2f} | {m.activations:.2f} "
                f"| {m.total('resident'):.1f} | {m.total('offload'):.1f} | {choice[0]} | {choice[1]} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    print(wan22_table())
    m = wan22_memory("480p", 1)
    print(
        f"\noffload: {m.host_pinned('offload'):.1f} GB pinned host memory per rank; one expert swap "
        f"{m.expert_weights:.1f} GB ≈ {m.swap_seconds():.2f} s at {H2D_GBPS:.0f} GB/s"
    )


if __name__ == "__main__":
    main()
