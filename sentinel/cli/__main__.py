from sentinel.cli import app

app()
