// Both browser SDKs as their npm packages ship them, exposed to the test page.
// RudderStack's "bundled" build carries its plugins (no CDN fetch for them).
import { AnalyticsBrowser } from '@segment/analytics-next';
import { RudderAnalytics } from '@rudderstack/analytics-js/bundled';

window.AnalyticsBrowser = AnalyticsBrowser;
window.RudderAnalytics = RudderAnalytics;
