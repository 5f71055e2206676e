"""Past one process: the process group and device mesh, FSDP2 over a model's blocks, the collectives the
trainers use (`distributed`), and how a job's processes tell each other they are leaving (`peers`).

The bottom of the engine: it knows torch.distributed and nothing of models, run directories or trainers, so
every other package may import it and it imports none of them (a world of one is the identity everywhere,
so single-process code calls it too)."""
