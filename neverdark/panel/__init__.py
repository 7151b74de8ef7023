"""The operator's panel: `neverdark panel` serves the fleet's status as a live web page
(server.py; the page's files in static/, shipped in the wheel)."""
