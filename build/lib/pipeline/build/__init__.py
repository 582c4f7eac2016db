"""Building an image at a commit and pushing it to the registry by digest (or building
on each target host when there is no registry). Uses `sources/` for the build context,
`hosts/` for the engine and `state/` to record builds; never `deploy/` or above."""
