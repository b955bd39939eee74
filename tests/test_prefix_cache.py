"""The automatic prefix cache: shared prompt blocks give the same tokens, its block size
is a setting, it leaves a token to prefill and stays within its budget."""

import pytest
import torch

from server.engine.lora import AdapterSet
from server.engine.model import LlamaRunner, Segment
from server.engine.types import GenRequest, RowSpec
from tests.engine_util import Collector, greedy
from tests.tiny import tiny_engine, tiny_model


def test_prefix_cache_serves_shared_prompt_blocks_with_the_same_tokens():
    shared = list(range(60, 100))  # 40 tokens: two full 16-token blocks are shareable
    eng = tiny_engine()
    first, second, with_adapter = Collector(), Collector(), Collector()
    eng.worker.submit(GenRequest("a", [RowSpec(shared + [5, 6])], greedy(8)), first)
    while eng.worker.step():
        pass
    assert first.events[-1].cached_tokens == 0
    eng.worker.submit(GenRequest("b", [RowSpec(shared + [5, 6])], greedy(8)), second)
    while eng.worker.step():
        pass
    assert second.events[-1].cached_tokens == 32 and second.tokens == first.tokens
    # rows with low-rank deltas have other KV for the same tokens: they never use the cache
    aset = AdapterSet({(0, "up_proj"): (torch.zeros(1, 64), torch.zeros(128, 1))})
    eng.worker.submit(GenRequest("c", [RowSpec(shared + [5, 6], adapters=aset)], greedy(8)), with_adapter)
    while eng.worker.step():
        pass
    assert with_adapter.events[-1].cached_tokens == 0 and with_adapter.tokens == first.tokens


def test_prefix_cache_block_size_is_a_setting():
    # finer blocks share more of a common prefix (vLLM's --block-size); 0 is refused at start
    from server.config import Settings
    from server.engine.prefix_cache import PrefixCache
    from server.runtime import worker_limits

    limits = worker_limits(Settings.from_env(env={"KNOWMUX_PREFIX_CACHE_BLOCK": "4"}))
    assert limits.prefix_cache_block == 4
    eng = tiny_engine(limits)
    shared = list(range(60, 98))  # 38 tokens: 16 + 16 shareable in blocks of 16, 36 in blocks of 4
    first, second = Collector(), Collector()
    for name, sink in (("a", first), ("b", second)):
        eng.worker.submit(GenRequest(name, [RowSpec(shared + [5, 6])], greedy(8)), sink)
        while eng.worker.step():
            pass
    assert second.events[-1].cached_tokens == 36 and second.tokens == first.tokens
    with pytest.raises(ValueError, match="at least 1 token"):
        PrefixCache(block=0)


def test_prefix_cache_leaves_a_token_to_prefill_and_is_bounded():
    from server.engine.prefix_cache import PrefixCache

    runner = LlamaRunner(tiny_model())
    ids = list(range(10, 42))  # exactly two blocks
    cache = runner.new_cache(40)
    runner.forward(torch.tensor(ids), [Segment(cache, 0, len(ids))])
    pc = PrefixCache(block=16, max_tokens=16)
    pc.insert(ids, cache)
    assert len(pc._blocks) == 1  # bounded to one block: the first was evicted
    pc = PrefixCache(block=16, max_tokens=64)
    pc.insert(ids, cache)
    hit = pc.lookup(ids)
    assert hit.length == 16  # 32 tokens = 2 blocks, but one token must stay to produce logits
    assert pc.lookup(ids + [1]).length == 32 and pc.lookup([9] + ids) is None
    torch.testing.assert_close(hit.kv, cache.kv[:, :, :, :16])
