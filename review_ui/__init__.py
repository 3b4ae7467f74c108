"""The reviewers' web app (layer: beside the launchers; may import ``tasks`` and ``capture``,
never ``flows``). See docs/ARCHITECTURE.md."""
