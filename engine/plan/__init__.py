"""`python -m engine plan`: what a job holds per rank before it runs, by simulation.

The models are built on the meta device from their config.json (no weights, no memory) in a fake world of
nodes x gpus_per_node ranks (torch's "fake" process group), sharded by the engine's own
`models.sharding.shard`; each rank's shard sizes are read off the DTensors, the activations of one transformer
block are traced under FakeTensorMode with torch's MemTracker at the micro-batch's tokens, and the rollout
engine's weights and KV cache follow from its tensor-parallel degree and the rollout batch. See
`estimate.py` for what is counted and `search.py` for the smallest setting that fits.

Above the models and the rollout engine (whose sizes it simulates), beside the trainers: it runs nothing of
them and writes no run directory."""
