"""The serial/parallel thresholds as a rule of the core count and the last-level cache
(fastbn._backends.parallel_min_bytes)."""
from fastbn import _backends
from fastbn._backends import CROSSOVER_2_CORES_BYTES, parallel_min_bytes

MiB = 2**20


def test_two_cores_and_32_mib_give_the_measured_crossovers():
    assert parallel_min_bytes(2, 32 * MiB) == CROSSOVER_2_CORES_BYTES
    assert parallel_min_bytes(1, 32 * MiB) == CROSSOVER_2_CORES_BYTES  # one core: never used


def test_more_cores_lower_the_thresholds_to_at_least_half():
    before = CROSSOVER_2_CORES_BYTES
    for cores in (3, 4, 8, 16, 64, 256):
        table = parallel_min_bytes(cores, 1024 * MiB)
        for key, value in table.items():
            assert CROSSOVER_2_CORES_BYTES[key] // 2 <= value <= before[key], (cores, key)
        before = table
    assert parallel_min_bytes(8, 1024 * MiB)["cython", "outer", "forward"] == 128 * 1024 * 8 // 14


def test_a_core_share_of_the_cache_caps_them():
    """x and y (x, dy and dx in backward) beyond one core's share of the cache: the team."""
    table = parallel_min_bytes(16, 8 * MiB)
    assert table["numba", "inner", "forward"] == 8 * MiB // (2 * 16)
    assert table["numba", "inner", "backward"] == 8 * MiB // (3 * 16)


def test_the_table_in_use_follows_the_rule_here():
    assert _backends.PARALLEL_MIN_BYTES == parallel_min_bytes(
        _backends.thread_limit(), _backends.last_level_cache_bytes())
