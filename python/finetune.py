"""``python python/finetune.py [options]``: the fine-tuning job, the same as ``python -m alast_finetune``.

Kept at this path for the commands recorded with the results that name it; the job is the package
:mod:`alast_finetune` beside this file, which Python finds here because a script's own directory is on its path.
"""
from alast_finetune.finetune import main

if __name__ == "__main__":
    main()
