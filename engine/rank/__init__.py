"""Ranking architectures without training them: zero-cost proxies (:mod:`.proxies`)."""
