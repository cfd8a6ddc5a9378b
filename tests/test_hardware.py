"""softpo/hardware.py: bf16 autocast is chosen only where the processor has bf16 matrix units."""

from softpo import hardware

ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 avx avx2 fma f16c
"""
SAPPHIRE_RAPIDS = """processor\t: 0
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu
"""


def test_cpu_flags_reads_the_first_processor():
    assert hardware.cpu_flags(ZEN2) == {"fpu", "sse", "sse2", "avx", "avx2", "fma", "f16c"}
    assert "amx_bf16" in hardware.cpu_flags(SAPPHIRE_RAPIDS)
    assert hardware.cpu_flags("") == set()


def test_bf16_is_fast_follows_the_flags(monkeypatch):
    hardware.bf16_is_fast.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    assert hardware.bf16_is_fast("cpu") is False
    hardware.bf16_is_fast.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert hardware.bf16_is_fast("cpu") is True
    hardware.bf16_is_fast.cache_clear()
