"""Users' own data files: their formats and checks (`formats`) and their encoding through the tokenizer's chat
template (`encode`). Reads files and tokenizers only, and imports nothing else of the engine, so the labeling
app, the built-in task and the stages can all share it."""
