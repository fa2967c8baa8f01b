"""Compare LLaVA-RadZ with the three baselines on SYNTHETIC phantom chest radiographs: `radz-compare` from a
checkout (radz/compare.py has the options).

    python examples/compare_methods.py --model outputs/demo/model --data_dir outputs/demo/data --limit 200
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from radz.compare import main  # noqa: E402

if __name__ == "__main__":
    main()
