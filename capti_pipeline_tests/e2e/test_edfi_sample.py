from capti_pipeline_tests.support.harness import EDFI


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
