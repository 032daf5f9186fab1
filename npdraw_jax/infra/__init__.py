"""What runs the model: data, the run directory and its records, checkpoints,
sharding over devices and hosts, distributed start-up, interrupts, the workdir
lock, the train loop and the pictures written to disk."""
