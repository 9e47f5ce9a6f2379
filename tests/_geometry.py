"""Hypothesis strategies for valid convolution geometries (shared by operator tests)."""

from hypothesis import strategies as st


@st.composite
def conv_geometry(draw, transposed: bool, max_dilation: int = 2):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    if transposed:
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1))
                               for s, d in zip(stride, dilation))
    else:
        output_padding = (0, 0)
    # Input large enough that every geometry yields a non-empty output.
    h = draw(st.integers(dilation[0] * (kh - 1) + 1, dilation[0] * (kh - 1) + 6))
    w = draw(st.integers(dilation[1] * (kw - 1) + 1, dilation[1] * (kw - 1) + 6))
    batch = draw(st.integers(1, 3))
    return dict(groups=groups, cin=cin, cout=cout, kernel=(kh, kw), stride=stride,
                dilation=dilation, padding=padding, output_padding=output_padding,
                size=(h, w), batch=batch)


def weight_shape(g, transposed: bool):
    if transposed:
        return (g["cin"], g["cout"] // g["groups"]) + g["kernel"]
    return (g["cout"], g["cin"] // g["groups"]) + g["kernel"]


def build(fj, g, weight, transposed: bool, bias=None, **options):
    """The operator for geometry ``g`` (``options``: further constructor keywords, e.g.
    ``method``); hypothesis discards geometries with an empty output."""
    from hypothesis import assume

    h_out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in
             zip(g["size"], g["stride"], g["padding"], g["dilation"], g["kernel"],
                 g["output_padding"])]
    assume(not transposed or min(h_out) >= 1)
    kwargs = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                  groups=g["groups"], in_size=g["size"], layout=g.get("layout", "auto"),
                  **options)
    if transposed:
        return fj.ConvTranspose2d(weight, bias, output_padding=g["output_padding"], **kwargs)
    return fj.Conv2d(weight, bias, **kwargs)
