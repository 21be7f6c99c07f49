"""The AOT sweeps' results cache (tests/kernels/aot.py ``cached_sweep``): a hit only for the very inputs
the records were made from; any changed kernel file, script, tool version or setting compiles again.

A stand-in sweep script (no Triton compile) records every run in a counter file and reports what the
"kernel" file it was given says, so a test can see both whether it ran and what its records reflect.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import aot

FAKE_SWEEP = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    kernels = Path(sys.argv[1])
    with open(kernels.parent / "runs.txt", "a") as f:
        f.write("run\\n")
    source = (kernels / "op.py").read_text()
    print(json.dumps([{"kernel": "op", "ok": "BROKEN" not in source}]))
''')


# A miss warns (commit the rewritten file); here every miss is intended.
pytestmark = pytest.mark.filterwarnings("ignore:.*compiled afresh:UserWarning")


@pytest.fixture
def sweep(tmp_path):
    """``run(**changed_inputs)`` -> (records, hit, runs so far), and the stand-in kernel package to edit."""
    kernels = tmp_path / "kernels"
    (kernels / "configs").mkdir(parents=True)
    (kernels / "op.py").write_text("def op(): pass\n")
    (kernels / "configs" / "table.json").write_text('{"sm90": [64]}\n')
    script = tmp_path / "aot_fake_cases.py"
    script.write_text(FAKE_SWEEP)

    def run(**changed):
        inputs = {**aot.sweep_inputs(str(script), (str(kernels),), kernel_dir=kernels, env={}), **changed}
        records, hit = aot.cached_sweep(str(script), str(kernels), results_dir=tmp_path / "results", inputs=inputs)
        return records, hit, (tmp_path / "runs.txt").read_text().count("run")

    run.script = script
    return run, kernels


def test_same_inputs_hit_without_running(sweep):
    run, _ = sweep
    first, hit, runs = run()
    assert (first, hit, runs) == ([{"kernel": "op", "ok": True}], False, 1)
    again, hit, runs = run()
    assert (again, hit, runs) == (first, True, 1)


@pytest.mark.parametrize("edited", ["op.py", "configs/table.json", "configs/new_table.json"])
def test_a_changed_kernel_file_recompiles(sweep, edited):
    run, kernels = sweep
    run()
    path = kernels / edited
    path.write_text((path.read_text() if path.exists() else "") + "# BROKEN\n")
    records, hit, runs = run()
    assert not hit and runs == 2
    # The records are the new run's: a source that breaks the (stand-in) compile fails, not the old pass.
    assert records == [{"kernel": "op", "ok": edited != "op.py"}]
    assert run()[1:] == (True, 2)  # and they are what is kept


@pytest.mark.parametrize("change", [{"triton": "0.0.0"}, {"torch": "0.0"}, {"ptxas": "0" * 64},
                                    {"env": {"TRITON_DEFAULT_FP_FUSION": "0"}}])
def test_other_tools_or_settings_recompile(sweep, change):
    run, _ = sweep
    run()
    assert run(**change)[1:] == (False, 2)


def test_a_changed_sweep_script_recompiles(sweep):
    run, _ = sweep
    run()
    run.script.write_text(run.script.read_text() + "# one more case\n")
    assert run()[1:] == (False, 2)


def test_a_corrupt_results_file_recompiles(sweep, tmp_path):
    run, kernels = sweep
    run()
    for path in (tmp_path / "results").glob("*.json"):
        path.write_text("{not json")
    assert run()[1:] == (False, 2)


def test_the_key_covers_every_kernel_file_and_the_sweep_scripts():
    """For the real sweeps: the hashed package is the one a sweep subprocess imports, every file of it
    counts, and only settings that cannot change a compile are left out of the key."""
    import peftfast.kernels

    assert aot.kernel_package_dir() == Path(peftfast.kernels.__file__).resolve().parent
    hashed = {name for name, _ in aot._tree(aot.kernel_package_dir(), "kernels")}
    assert {"kernels/lora.py", "kernels/matmul.py", "kernels/configs/lora_matmul.json"} <= hashed
    script = str(aot.HERE / "aot_lora_cases.py")
    base = aot.sweep_inputs(script, (), env={})
    assert base["ptxas"] is not None and base["triton"] and base["torch"]
    assert aot.sweep_inputs(script, (), env={"TRITON_CACHE_DIR": "/elsewhere"}) == base
    assert aot.sweep_inputs(script, (), env={"PEFTFAST_TUNING_TABLES": "/no/such/dir"}) == base
    assert aot.sweep_inputs(script, (), env={"PEFTFAST_TUNING": "off"})["env"] == {"PEFTFAST_TUNING": "off"}
    assert aot.sweep_inputs(script, ("--all",), env={}) != base


def test_committed_records_are_the_default_sweeps():
    """aot_results/ holds the three default sweeps' records (what CI reuses), each with its key."""
    names = {p.name for p in aot.RESULTS_DIR.glob("*.json")}
    assert names == {"aot_lora_cases.json", "aot_adapter_cases.json", "aot_qmatmul_cases.json"}
    for name in names:
        saved = json.loads((aot.RESULTS_DIR / name).read_text())
        assert saved["records"] and len(saved["digest"]) == 64 and saved["inputs"]["script"] == name[:-5] + ".py"


def test_a_miss_says_to_commit_the_records(sweep):
    run, _ = sweep
    with pytest.warns(UserWarning, match="compiled afresh.*commit"):
        run()


def test_extra_tuning_tables_count_by_their_contents(tmp_path):
    script = str(aot.HERE / "aot_lora_cases.py")
    tables = tmp_path / "tables"
    tables.mkdir()
    env = {"PEFTFAST_TUNING_TABLES": str(tables)}
    empty = aot.sweep_inputs(script, (), env=env)["sources"]
    (tables / "sm90.json").write_text('{"entries": {}}\n')
    one = aot.sweep_inputs(script, (), env=env)["sources"]
    (tables / "sm90.json").write_text('{"entries": {"k": {}}}\n')
    assert len({empty, one, aot.sweep_inputs(script, (), env=env)["sources"]}) == 3
