"""Zero-shot evaluation of LLaVA-RadZ and its baselines: the script form of `radz-evaluate` (see its `--help`).

    python evaluate_radz.py --model CKPT --dataset chexpert --data_dir /data/CheXpert-v1.0-small --split valid \\
        --threshold_protocol fixed --bootstrap 1000 --output_dir outputs/eval [--update_card]

`main(argv)` returns the metrics.json record (radz/cli.py, radz/evaluation/harness.py).
"""

import sys

from radz.cli import evaluate_main as main

if __name__ == "__main__":
    main(sys.argv[1:])
