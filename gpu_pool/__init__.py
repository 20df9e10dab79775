"""tokenpool.gpu_pool"""
