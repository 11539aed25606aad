"""bench/_host.py: the host's CPU pressure read from Linux PSI, for reading bench tails."""

from __future__ import annotations

from pathlib import Path

from agentcluster.bench._host import CpuPressure, read_cpu_stall_us

_PSI = (
    "some avg10=12.77 avg60=20.34 avg300=17.65 total={some}\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


def test_the_some_total_is_read(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text(_PSI.format(some=3811615747))
    assert read_cpu_stall_us(psi) == 3811615747


def test_a_missing_or_odd_file_gives_none(tmp_path: Path) -> None:
    assert read_cpu_stall_us(tmp_path / "absent") is None
    odd = tmp_path / "cpu"
    odd.write_text("full total=12\nsome avg10=1.0\n")
    assert read_cpu_stall_us(odd) is None
    with CpuPressure(tmp_path / "absent") as p:
        pass
    assert p.percent is None


def test_the_stalled_share_of_the_section_is_reported(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text(_PSI.format(some=1_000_000))
    with CpuPressure(psi) as p:
        # 10 s of stall during a section that cannot have lasted anywhere near that long.
        psi.write_text(_PSI.format(some=11_000_000))
    assert p.percent is not None and p.percent > 100.0


def test_the_real_counter_moves_forward() -> None:
    before = read_cpu_stall_us()
    with CpuPressure() as p:
        sum(range(10_000))
    if before is None:  # a kernel without PSI: the bench reports None, never a guess
        assert p.percent is None
    else:
        assert p.percent is not None and p.percent >= 0.0
