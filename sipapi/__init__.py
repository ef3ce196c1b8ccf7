"""sipapi: the scripting API of the article this project grew from (see docs/scripting.md)."""
