"""Infrastructure the method does not need to be understood: checkpoint I/O and public-weight translation,
atomic files and locks, number guards, torchrun (DDP / FSDP2) and its resumable checkpoints, model cards and
the hub, the paper-size memory plan. Imports nothing outside this folder."""
