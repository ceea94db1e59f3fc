from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "oneroster-samples"
EDFI = SAMPLES / "Ed-Fi-Exchange-OSS__LMS-Toolkit" / "oneroster-1.1"


def test_edfi_sample_imports_its_ten_users(capti_env):
    capti_env.register("edfi", EDFI)
    outcome = capti_env.run("edfi")
    assert outcome.state == "applied", outcome.report
    assert outcome.exit_code == 0
    snapshot = capti_env.snapshot("edfi")
    assert len(snapshot["users"]) == 10
    assert {u["role"] for u in snapshot["users"]} == {"student", "teacher"}
    assert len(snapshot["enrollments"]) == 24
    assert [loc["type"] for loc in snapshot["locations"]] == ["district", "school"]
    assert outcome.report["error_count"] == 0

    again = capti_env.run("edfi")
    assert again.state == "no_changes"
    assert capti_env.snapshot("edfi") == snapshot
