"""``python -m alast_finetune [options]``: the fine-tuning job (``--help`` lists the options)."""
from .finetune import main

main()
