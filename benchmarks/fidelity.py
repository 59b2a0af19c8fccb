"""Conditioning fidelity of a generated store: per-bin mean DAPI against per-bin cell count.

python benchmarks/fidelity.py tera_demo/demo.zarr
"""

from __future__ import annotations

import json
import sys

from tera_pipeline.evaluation.fidelity import conditioning_fidelity

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    result = conditioning_fidelity(sys.argv[1])
    print(
        json.dumps(
            {
                "benchmark": "fidelity",
                "store": sys.argv[1],
                **result,
                "target_r_at_least": 0.6,
                "pass": result["pearson_r"] >= 0.6,
            },
            indent=2,
        )
    )
