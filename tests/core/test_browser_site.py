"""The site writer on planted statistics: every page is written, self-contained, and shows what
it should (the group structure of a variant that has one, the planted latent's peak token)."""

from __future__ import annotations

import re

import numpy as np
import torch

from saeforge.core.browser.site import SiteData, write_site
from saeforge.core.browser.stats import LatentStats, cosine_histogram


def test_pages_show_groups_and_the_planted_peak(tmp_path):
    b, t, d = 6, 10, 4
    f = torch.zeros(b, t, d)
    f[2, 7, 1] = 5.0  # latent 1 fires once: context 2, token 7
    f[:, 3, 0] = 1.0
    mask = torch.ones(b, t, dtype=torch.bool)
    stats = LatentStats(d, top_k=3, samples=4)
    stats.update(f, mask, torch.arange(b))
    tokens = np.arange(b * t).reshape(b, t) % 26
    data = SiteData(
        title="planted <SAE>",
        info={"variant": "test"},
        stats=stats,
        pages=[0, 1],
        tokens=tokens,
        token_text=lambda i: chr(ord("a") + i),
        promoted={i: [(i, 1.0)] for i in range(d)},
        suppressed={i: [(25, -1.0)] for i in range(d)},
        similar={0: [(1, 0.5)], 1: [(0, 0.5), (3, 0.1)]},
        cosine_hist=cosine_histogram(torch.eye(d)),
        group_kind="level",
        group_labels=[1, 1, 2, 2],
    )
    index = write_site(data, tmp_path / "site")
    overview = index.read_text()
    assert "planted &lt;SAE&gt;" in overview and "Structure: 2 levels" in overview
    assert overview.count('<tr data-search="') == d and 'href="latents/1.html"' in overview
    assert 'href="latents/2.html"' not in overview  # no page, no link
    page = (tmp_path / "site" / "latents" / "1.html").read_text()
    peak = re.findall(r'<span class="t peak"[^>]*>(.)</span>', page)
    assert peak == [chr(ord("a") + int(tokens[2, 7]))] * page.count('class="t peak"') and peak
    assert 'href="0.html"' in page and ">3<" in page and 'href="3.html"' not in page
    for html_file in (tmp_path / "site").rglob("*.html"):
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html_file.read_text())
