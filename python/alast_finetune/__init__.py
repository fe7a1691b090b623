"""The fine-tuning job: several methods of :mod:`alast_kernels` fine-tuned from the same weights and compared.

``python -m alast_finetune [options]`` (``make demo``) runs the job (:mod:`finetune`); ``python -m
alast_finetune.study`` (``make study``) the comparison on a real pretrained ViT (:mod:`study`); ``python -m
alast_finetune.clutter_baselines`` the real-digit task's linear baselines (:mod:`clutter_baselines`). The other
modules are their parts: data (:mod:`digits_canvas`, :mod:`clutter_digits`), the model and its starting
weights (:mod:`starting_weights`, :mod:`real_backbone`, :mod:`dinov2_wheel`), one run and its costs
(:mod:`training`), and the output (:mod:`report`, :mod:`job_output`).

The package is installed with the library (``pip install -e .``, which ``make venv`` runs), from ``python/``
beside it; nothing here is imported on ``import alast_finetune``, so ``python -m alast_finetune.study`` runs
its module once.
"""
