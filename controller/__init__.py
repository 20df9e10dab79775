"""tokenpool.controller"""
