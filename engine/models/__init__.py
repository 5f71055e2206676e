"""Models: loading a user's transformers checkpoint (`loading`; sharded from the meta device with several
processes: `meta_load`, `sharding`), the forward passes every trainer runs (`forward`: token log-probs,
token values, sequence scores), their inputs (`batch`), prompt sharing (`shared_prompt`), the attention kernel
(`attention`), LoRA (`lora`) and the causal check (`causal`).

Above `engine.parallel` (sharding needs the mesh) and below everything that trains, rolls out or plans: it
reads checkpoints but never writes a run directory, and knows no trainer or task."""
