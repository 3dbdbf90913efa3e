"""How far apart two saved policies are: per tensor, the largest absolute difference and the L2 difference
relative to the first policy's tensor; prints JSON with the largest of each and the tensors they come from.

    .venv/bin/python benchmarks/weights_diff.py RUN_A/final RUN_B/final [RUN_C/final ...]

Every directory after the first is compared with the first (a ``save_pretrained`` directory: model.safetensors).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file


def difference(a: Path, b: Path) -> dict[str, object]:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if first.keys() != second.keys():
        raise SystemExit(f"{a} and {b} hold different tensors: {sorted(first.keys() ^ second.keys())[:5]}")
    absolute = {k: float((first[k] - second[k]).abs().max()) for k in first}
    relative = {k: float((first[k] - second[k]).norm() / first[k].norm()) for k in first}
    worst_abs, worst_rel = max(absolute, key=absolute.get), max(relative, key=relative.get)
    return {"against": str(b), "max_abs": absolute[worst_abs], "max_abs_tensor": worst_abs,
            "max_rel_l2": relative[worst_rel], "max_rel_l2_tensor": worst_rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", type=Path, nargs="+")
    args = parser.parse_args()
    if len(args.dirs) < 2:
        parser.error("needs at least two directories")
    print(json.dumps({"reference": str(args.dirs[0]),
                      "differences": [difference(args.dirs[0], other) for other in args.dirs[1:]]}, indent=1))


if __name__ == "__main__":
    main()
