"""Train LLaVA-RadZ (DFAT + DKAM) with the transformers Trainer: the script form of `radz-train`, for
`accelerate launch`.

    accelerate launch train_radz.py --config tiny --train_file data.jsonl --knowledge chest.json \
        --output_dir out --max_steps 100 --per_device_train_batch_size 8 --report_to none
    accelerate launch train_radz.py --base_model llava-hf/llava-1.5-7b-hf --dataset_name mimic_cxr \
        --data_dir /data/mimic-cxr --knowledge chexpert --bf16 --output_dir out --push_to_hub --hub_model_id me/radz
    python train_radz.py generate-knowledge ...      # radz-knowledge: write category descriptions

Every `TrainingArguments` flag works (`--save_steps`, `--resume_from_checkpoint`, `--gradient_accumulation_steps`,
`--use_cpu`, ...). The output directory receives a complete merged checkpoint (model, processor, knowledge, model
card) that loads with `AutoModel`/`AutoProcessor.from_pretrained(dir, trust_remote_code=True)`; `--push_to_hub`
uploads it (radz/training/run.py).
"""

import sys

from radz.cli import train as main

if __name__ == "__main__":
    sys.exit(main())
