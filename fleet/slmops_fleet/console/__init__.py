"""The fleet's web console (`/ui`): server-rendered page skeletons (`routes`), small vanilla scripts
that poll the JSON API and draw with the vendored uPlot (`static/`, package data: nothing fetched
from elsewhere, no build step), and the sign-in that turns a pasted admin token into a read-only
session cookie (`sessions`)."""
