"""What users import into their own Keras code: layers, setups, optimizers, schedules, callbacks, the LR finder,
MC prediction, health probes, freezing, backbones. Nothing here imports training, pipelines, store or CLI."""
