"""Privacy operating modes a hospital chooses (pure: never imports ``nvflare``).

- :mod:`fedmed.privacy.dp`: record-level DP-SGD settings, the noise multiplier from a budget, and the per-site
  :class:`~fedmed.privacy.dp.PrivacyLedger` (Opacus RDP / PRV accountants).
- :mod:`fedmed.privacy.compression`: float16 and 8-bit transfer, byte counting.
- :mod:`fedmed.privacy.release`: what may leave a site under the ``standard`` policy.
- :mod:`fedmed.privacy.scopes`: the modes as FLARE site scopes in ``local/privacy.json``.

The FLARE filters that apply these at a site live in :mod:`fedmed.flare.filters`.
"""

from fedmed.privacy.scopes import MODES, SIMULATABLE_MODES

__all__ = ["MODES", "SIMULATABLE_MODES"]
