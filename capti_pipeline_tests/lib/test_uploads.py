from capti_pipeline.lib.uploads import WatchState, ready_to_launch

COMPLETE = {"manifest.csv": (120, 1.0), "users.csv": (5000, 1.0)}


def test_a_stable_complete_upload_launches_once():
    state = WatchState()
    assert ready_to_launch(state, "d", COMPLETE) is None  # first look: wait
    signature = ready_to_launch(state, "d", COMPLETE)
    assert signature is not None
    restored = WatchState.from_cursor(state.to_cursor())
    assert ready_to_launch(restored, "d", COMPLETE) is None  # already launched


def test_a_growing_upload_waits_until_it_settles():
    state = WatchState()
    growing = {"manifest.csv": (120, 1.0), "users.csv": (100, 1.0)}
    assert ready_to_launch(state, "d", growing) is None
    grown = {"manifest.csv": (120, 1.0), "users.csv": (900, 2.0)}
    assert ready_to_launch(state, "d", grown) is None
    assert ready_to_launch(state, "d", grown) is not None


def test_no_manifest_no_run_and_new_delivery_launches_again():
    state = WatchState()
    partial = {"users.csv": (100, 1.0)}
    assert ready_to_launch(state, "d", partial) is None
    assert ready_to_launch(state, "d", partial) is None
    ready_to_launch(state, "d", COMPLETE)
    assert ready_to_launch(state, "d", COMPLETE) is not None
    tomorrow = {"manifest.csv": (120, 9.0), "users.csv": (5100, 9.0)}
    assert ready_to_launch(state, "d", tomorrow) is None
    assert ready_to_launch(state, "d", tomorrow) is not None
