"""fedpref.server"""
