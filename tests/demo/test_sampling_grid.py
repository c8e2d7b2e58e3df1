"""`bitlaws.demo.sampling_grid`: one row per member x setting; settings really change the samples."""

import pytest

from bitlaws.demo import family, sampling_grid


def test_grid_rows_and_settings_matter():
    rows = sampling_grid.evaluate_grid("var", cfgs=(0.0, 3.0), top_ps=(0.0,), n_per_class=2, members=["var-d1"])
    assert [(row["member"], row["cfg"]) for row in rows] == [("var-d1", 0.0), ("var-d1", 3.0)]
    assert all(row["dfd"] > 0 and 0 <= row["accuracy"] <= 1 for row in rows)
    assert rows[0]["dfd"] != rows[1]["dfd"]  # guidance changed the samples


def test_top_p_is_rejected_for_dit_and_unknown_family():
    member = family.load_member("dit-d2")
    with pytest.raises(ValueError, match="top_p"):
        sampling_grid._with_setting(member, 1.5, 0.9)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="unknown demo family"):
        family.member_names("nosuchfamily")
