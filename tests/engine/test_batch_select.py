"""SequenceBatch.select drops the prompt columns that are padding in every selected row: the rows' tokens,
positions and masks are the same, and so are their log-probs (float32; tolerance for the attention's sums over
fewer masked keys, which add exact zeros)."""
import torch

from engine.models.batch import make_batch
from engine.models.forward import PolicyLogprobs
from engine.task.tiny_checkpoint import build_config, build_tokenizer


def test_select_trims_shared_left_padding_and_keeps_every_value():
    import transformers

    tok = build_tokenizer("llama")
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(build_config("llama", tok, hidden=64, layers=2, heads=4))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16], [17]]
    answers = [[20, 21, 2], [22], [23, 24, 25, 26, 2], []]
    full = make_batch(prompts, answers, tok.pad_token_id)
    part = full.select([3, 1, 2])
    assert full.prompt_len == 7 and part.prompt_len == 3 and part.input_ids.shape[1] == full.input_ids.shape[1] - 4
    assert torch.equal(part.response_ids, full.response_ids[[3, 1, 2]])
    assert torch.equal(part.response_mask, full.response_mask[[3, 1, 2]])
    for row, i in enumerate([3, 1, 2]):  # the same real tokens at the same positions
        real = full.attention_mask[i].bool()
        assert torch.equal(part.input_ids[row][part.attention_mask[row].bool()], full.input_ids[i][real])
        assert torch.equal(part.position_ids[row][part.attention_mask[row].bool()], full.position_ids[i][real])
    assert full.select([0, 1]).prompt_len == 7  # the longest prompt keeps every column
    assert full.select([3]).prompt_len == 1
    with torch.no_grad():
        lp = PolicyLogprobs(lm, share_prompts=False)
        torch.testing.assert_close(lp(part), lp(full)[[3, 1, 2]], rtol=1e-6, atol=1e-6)
