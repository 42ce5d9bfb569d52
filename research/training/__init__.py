"""The shared training core, one concern a module:

    stage.py       what a stage gives the loop (Stage, Hook)
    trainer.py     Trainer: mesh, model, optimizer, shardings, jitted steps
    step.py        the pure train and eval steps
    init.py        where parameters come from (seed, init_from, resume, frozen trees, finished runs)
    loop.py        train(): the loop and its hooks (log, checkpoint, evaluate, samples)
    dry_run.py     compile on abstract inputs and report memory and FLOPs
    validate.py    run checks before compiling
    failstop.py    one process's error stops every process of a multi-process run
    sharding.py, checkpoint.py, metrics.py, optimizer.py, state.py

Nothing here imports research.stages: research/main.py picks the stage and
hands it to loop.train.
"""
