"""All routers of the API."""

from fastapi import APIRouter

from api.admin.endpoints import router as admin_router
from api.corpora.endpoints import router as corpora_router
from api.events.endpoints import router as events_router
from api.health.endpoints import router as health_router
from api.jobs.endpoints import router as jobs_router
from api.kinds.endpoints import router as kinds_router
from api.metrics import router as metrics_router
from api.openai.batches import router as openai_batches_router
from api.openai.files import router as openai_files_router
from api.usage.endpoints import router as usage_router
from api.webhooks.endpoints import router as webhooks_router

router = APIRouter()
router.include_router(health_router)
router.include_router(metrics_router)
router.include_router(jobs_router)
router.include_router(kinds_router)
router.include_router(events_router)
router.include_router(webhooks_router)
router.include_router(usage_router)
router.include_router(corpora_router)
router.include_router(openai_files_router)
router.include_router(openai_batches_router)
router.include_router(admin_router)
