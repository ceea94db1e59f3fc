from capti_pipeline_tests.e2e.test_delivery_channels import _imported
from capti_pipeline_tests.fixtures.deliveries import baseline
def test_x(capti_env):
    _imported(capti_env, "bulk", baseline())
    n = baseline(); n.remove_row("users.csv", "0071").remove_row("enrollments.csv", "e2")
    n.write(capti_env.delivery_dir("bulk"))
    o = capti_env.run("bulk"); print(o.state, o.report["holds"], o.report["reason"])
    from capti_pipeline.lib import store as st
    with capti_env.engine().connect() as c: print(st.get_district(c, "bulk").thresholds)
