"""The operator console: server-rendered pages at /console (routes in app/api/console.py).

Templates and the two static files (CSS, a small script) live beside this module
and ship in the wheel; nothing is fetched from anywhere else. `session` signs the
login cookie and the CSRF tokens; `overview` gathers what a page shows.
"""
