from appliance.dicom.volume import Slice, verdict


def stack(n, spacing=2.0, thickness=2.0, sbs=2.0, orient=(1, 0, 0, 0, 1, 0)):
    return [Slice(f"1.{i}", (0.0, 0.0, i * spacing), orient, thickness, sbs) for i in range(n)]


def test_even_stack_is_a_volume():
    v = verdict(stack(10), 0.1)
    assert v.ok and "10 slices, 2.000 mm apart" in v.reason


def test_single_slice_is_not():
    assert not verdict(stack(1), 0.1).ok


def test_thickness_and_spacing_between_slices_must_agree():
    v = verdict(stack(5, thickness=3.0, sbs=2.0), 0.1)
    assert not v.ok and "Slice Thickness 3.0" in v.reason
    assert verdict(stack(5, thickness=2.05, sbs=2.0), 0.1).ok


def test_measured_spacing_must_agree_with_spacing_between_slices():
    v = verdict(stack(5, spacing=2.5, thickness=2.0, sbs=2.0), 0.1)
    assert not v.ok and "measured" in v.reason


def test_uneven_gap():
    s = stack(5)
    s[3] = Slice("1.3", (0.0, 0.0, 6.6), (1, 0, 0, 0, 1, 0), 2.0, 2.0)
    v = verdict(s, 0.1)
    assert not v.ok and "uneven" in v.reason


def test_inconsistent_orientation():
    s = stack(3)
    s.append(Slice("1.9", (0.0, 0.0, 6.0), (0, 1, 0, 0, 0, 1), 2.0, 2.0))
    assert "orientation" in verdict(s, 0.1).reason


def test_missing_geometry_and_unsorted_input():
    s = stack(4)[::-1]
    assert verdict(s, 0.1).ok
    assert not verdict([Slice("1", None, None, None, None)] * 2, 0.1).ok
