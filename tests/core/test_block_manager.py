"""BlockManager: block accounting, prefix-cache hits by chain hash, eviction order."""

from __future__ import annotations

from titanserve.core.block_manager import BlockManager
from titanserve.core.request import Request
from titanserve.core.sampling_params import SamplingParams


def make_request(token_ids: list[int], request_id: str = "r") -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=4, temperature=0.0))


def computed(block_manager: BlockManager, request: Request) -> Request:
    """Allocate a request's whole prompt, mark it computed and publish its full blocks."""
    cached = block_manager.find_cached_prefix(request)
    block_manager.allocate(request, cached, request.num_tokens)
    request.num_computed_tokens = request.num_tokens
    block_manager.cache_full_blocks(request)
    return request


def test_blocks_needed_rounds_up_to_whole_blocks():
    block_manager = BlockManager(num_blocks=4, block_size=4)
    assert [block_manager.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_account_for_every_block():
    block_manager = BlockManager(num_blocks=8, block_size=4)
    request = make_request(list(range(3, 13)))  # 10 tokens: 3 blocks
    assert block_manager.can_allocate([], 10)
    block_manager.allocate(request, [], 10)
    assert request.block_ids == [0, 1, 2]
    assert block_manager.ref_counts == [1, 1, 1, 0, 0, 0, 0, 0]
    assert block_manager.num_free_blocks == 5
    assert block_manager.usage == 3 / 8
    block_manager.free(request)
    assert request.block_ids == []
    assert block_manager.ref_counts == [0] * 8
    assert block_manager.num_free_blocks == 8


def test_can_allocate_and_can_append_stop_at_the_last_free_block():
    block_manager = BlockManager(num_blocks=4, block_size=4)
    assert block_manager.can_allocate([], 16)
    assert not block_manager.can_allocate([], 17)
    request = make_request([5] * 5)
    block_manager.allocate(request, [], 5)  # 2 blocks
    assert block_manager.can_append(request, 16)
    assert not block_manager.can_append(request, 17)
    block_manager.append(request, 8)  # still 2 blocks
    assert request.block_ids == [0, 1]
    block_manager.append(request, 9)
    assert request.block_ids == [0, 1, 2]
    assert block_manager.num_free_blocks == 1


def test_prefix_hit_shares_computed_blocks_and_counts_references():
    block_manager = BlockManager(num_blocks=16, block_size=4)
    a = computed(block_manager, make_request(list(range(3, 13)), "a"))  # 2 full blocks + 2
    b = make_request(list(range(3, 11)) + [100, 101, 102], "b")  # shares 8 tokens with a
    cached = block_manager.find_cached_prefix(b)
    assert cached == a.block_ids[:2]
    block_manager.allocate(b, cached, b.num_tokens)
    assert b.block_ids == [a.block_ids[0], a.block_ids[1], 3]
    assert block_manager.ref_counts[:4] == [2, 2, 1, 1]
    block_manager.free(a)
    assert block_manager.ref_counts[:4] == [1, 1, 0, 1]
    assert list(block_manager.free_blocks)[-1] == 2  # only a's unshared tail block came back
    block_manager.free(b)
    assert block_manager.ref_counts == [0] * 16


def test_last_prompt_token_is_never_taken_from_the_cache():
    """Its step produces the next token's logits, so it is always computed."""
    block_manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(3, 11))  # exactly 2 full blocks
    a = computed(block_manager, make_request(prompt, "a"))
    assert len(block_manager.hash_to_block) == 2
    assert block_manager.find_cached_prefix(make_request(prompt, "same")) == a.block_ids[:1]
    longer = make_request(prompt + [50], "longer")
    assert block_manager.find_cached_prefix(longer) == a.block_ids[:2]


def test_only_fully_computed_blocks_are_published():
    block_manager = BlockManager(num_blocks=16, block_size=4)
    request = make_request(list(range(3, 13)))
    block_manager.allocate(request, [], request.num_tokens)
    request.num_computed_tokens = 7  # a chunk boundary inside block 1
    block_manager.cache_full_blocks(request)
    assert list(block_manager.hash_to_block.values()) == [0]
    request.num_computed_tokens = 10
    block_manager.cache_full_blocks(request)
    assert sorted(block_manager.hash_to_block.values()) == [0, 1]


def test_equal_block_after_a_different_prefix_is_a_miss():
    block_manager = BlockManager(num_blocks=16, block_size=4)
    computed(block_manager, make_request([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    other_prefix = make_request([9, 9, 9, 9, 5, 6, 7, 8, 9], "b")
    assert block_manager.find_cached_prefix(other_prefix) == []


def test_same_content_computed_twice_keeps_the_first_block():
    block_manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(3, 12))
    a, b = make_request(prompt, "a"), make_request(prompt, "b")
    for request in (a, b):  # scheduled in the same step: neither hits the other
        block_manager.allocate(request, [], request.num_tokens)
    for request in (a, b):
        request.num_computed_tokens = request.num_tokens
        block_manager.cache_full_blocks(request)
    assert sorted(block_manager.hash_to_block.values()) == a.block_ids[:2]
    assert [block_manager.block_hash[block] for block in b.block_ids] == [None] * 3
    assert block_manager.find_cached_prefix(make_request(prompt, "c")) == a.block_ids[:2]


def test_eviction_takes_never_used_then_least_recently_freed_tail_first():
    block_manager = BlockManager(num_blocks=6, block_size=4)
    prompt = list(range(3, 15))  # 12 tokens: 3 full blocks
    a = computed(block_manager, make_request(prompt, "a"))
    assert a.block_ids == [0, 1, 2]
    block_manager.free(a)
    assert list(block_manager.free_blocks) == [3, 4, 5, 2, 1, 0]
    filler = make_request([7] * 16, "filler")  # 4 blocks: evicts a's tail block only
    block_manager.allocate(filler, [], 16)
    assert filler.block_ids == [3, 4, 5, 2]
    assert sorted(block_manager.hash_to_block.values()) == [0, 1]
    again = make_request(prompt + [99], "again")
    assert block_manager.find_cached_prefix(again) == [0, 1]
    # Reviving the 2 cached blocks uses up both free blocks: no room for the other 2.
    assert not block_manager.can_allocate([0, 1], again.num_tokens)
    assert block_manager.can_allocate([0, 1], 8)


def test_earlier_freed_request_is_evicted_before_a_later_one():
    block_manager = BlockManager(num_blocks=4, block_size=4)
    first = computed(block_manager, make_request([11] * 4 + [1], "first"))
    second = computed(block_manager, make_request([22] * 4 + [1], "second"))
    block_manager.free(first)
    block_manager.free(second)
    assert list(block_manager.free_blocks) == [1, 0, 3, 2]
    block_manager.allocate(make_request([5] * 8, "new"), [], 8)  # takes blocks 1 and 0
    assert block_manager.find_cached_prefix(make_request([11] * 4 + [1], "x")) == []
    assert block_manager.find_cached_prefix(make_request([22] * 4 + [1], "y")) == [2]


def test_prefix_caching_off_never_hits():
    block_manager = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    prompt = list(range(3, 15))
    computed(block_manager, make_request(prompt, "a"))
    assert block_manager.hash_to_block == {}
    assert block_manager.find_cached_prefix(make_request(prompt + [1], "b")) == []


def test_reset_prefix_cache_forgets_every_block():
    block_manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(3, 15))
    block_manager.free(computed(block_manager, make_request(prompt, "a")))
    block_manager.reset_prefix_cache()
    assert block_manager.hash_to_block == {}
    assert block_manager.block_hash == [None] * 16
    assert block_manager.find_cached_prefix(make_request(prompt + [1], "b")) == []
