"""mokd_jax.machine: the benchmarks' machine section."""

from mokd_jax.machine import cpu_model


def test_cpu_model_reads_the_model_name_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n")
    assert cpu_model(str(cpuinfo)) == "AMD EPYC 9B14"
    cpuinfo.write_text("processor\t: 0\nflags\t: avx512f\n")
    assert cpu_model(str(cpuinfo)) is None
    assert cpu_model(str(tmp_path / "absent")) is None
