"""Peak host memory of restoring a float32 checkpoint as bfloat16, against restore-then-cast.

Claim: `load_params(dtype="bfloat16")` casts each leaf while reading, so its peak memory is about one
copy of the bfloat16 result (half the stored bytes), not the float32 tree plus its cast; and with
`expected` it reads only the expected leaves. Leaves are read in groups (`read_batch_bytes`) so the
decode buffers in flight stay small next to the result. Each variant runs in a fresh process (peak RSS is per
process, read from /proc/self/status after resetting it), on a synthetic checkpoint shaped like a few stacked Gemma layers.

    .venv/bin/python bench/checkpoint.py [--mib 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

VARIANTS = {
    "baseline: restore float32, then cast": "naive",
    "load_params(bfloat16), all leaves in one read": "one_read",
    "load_params(bfloat16), reads of 1/8 checkpoint": "batched",
    "... and expected = half the leaves": "partial",
}

_CHILD = r"""
import json, sys
import numpy as np, ml_dtypes, jax
from latentpi.server.model.checkpoint import load_params
path, variant = sys.argv[1], sys.argv[2]
def high_water_kib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark after the imports
before = high_water_kib()
if variant == "naive":
    params = load_params(path)
    params = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params)
elif variant == "one_read":
    params = load_params(path, dtype="bfloat16", read_batch_bytes=2**62)
else:
    # 1/8 of the stored bytes per read, as the 1 GiB default is for pi0's float32 leaves (~13 GB).
    batch = int(sys.argv[3]) * 4
    shapes = None
    if variant == "partial":
        shapes = {"layers": {f"w{i}": jax.ShapeDtypeStruct((int(sys.argv[3]),), np.float32) for i in range(0, 8, 2)}}
    params = load_params(path, dtype="bfloat16", expected=shapes, read_batch_bytes=batch)
result = sum(a.nbytes for a in jax.tree.leaves(params))
peak = high_water_kib()
print(json.dumps({"peak_mib": (peak - before) / 1024, "result_mib": result / 2**20}))
"""


def write_checkpoint(directory: pathlib.Path, mib: int) -> int:
    import numpy as np

    from latentpi.server.model.checkpoint import save_params

    elements = mib * 2**20 // 4 // 8
    rng = np.random.default_rng(0)
    params = {
        "layers": {f"w{i}": rng.standard_normal(elements, dtype=np.float32) for i in range(8)}
    }
    save_params(directory / "params", params)
    return elements


def measure(path: pathlib.Path, variant: str, elements: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), variant, str(elements)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mib", type=int, default=512, help="float32 size of the synthetic checkpoint"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        elements = write_checkpoint(pathlib.Path(tmp), args.mib)
        rows = {}
        for label, variant in VARIANTS.items():
            runs = [measure(pathlib.Path(tmp), variant, elements) for _ in range(args.repeats)]
            rows[label] = (
                statistics.median(r["peak_mib"] for r in runs),
                statistics.median(r["result_mib"] for r in runs),
            )
    base = rows[next(iter(VARIANTS))][0]
    print(
        f"checkpoint: {args.mib} MiB float32 on disk, 8 leaves; medians of {args.repeats} fresh processes"
    )
    print(
        f"{'variant':<48} {'peak RSS growth MiB':>20} {'result MiB':>11} {'peak/result':>12} {'vs baseline':>12}"
    )
    for label, (peak, result) in rows.items():
        print(
            f"{label:<48} {peak:>20.0f} {result:>11.0f} {peak / result:>12.2f} {peak / base:>12.2f}"
        )


if __name__ == "__main__":
    main()
