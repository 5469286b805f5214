//! Keap's names for what the mapping refers to by name: custom fields (`GET /v1/contacts/model`)
//! and tags (`GET /v1/tags`), each resolved once per process and cached.
//!
//! Why a cache, and why per process: a name is looked up the first time a change needs it and
//! then never again, so a steady stream of changes costs no extra calls. A custom field or tag
//! renamed in Keap while the daemon runs is seen after a restart (the README says so); a tag
//! that does not exist is created only when `[tags] create_missing = true`, and otherwise the
//! change that needs it is parked with a message naming the tag.
//!
//! Tag creation is serialised by an in-process lock held across the lookup and the create, so
//! concurrent deliveries needing the same missing tag create it once. Only the instance that
//! holds the delivery lock delivers (invariant 9), so no second process races it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use crate::config::TagRef;
use crate::keap::{Auth, KeapClient, KeapError};
use crate::mapping::CustomModel;

/// What resolving tag names found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tags {
    /// Every name has an id.
    Ids(BTreeMap<TagRef, i64>),
    /// These tags do not exist in Keap and may not be created (or, in a dry run, would be),
    /// each quoted.
    Missing(Vec<String>),
}

/// The cache. One per daemon (it outlives database reconnects) or per `preview` run.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    model: OnceCell<CustomModel>,
    tags: Mutex<HashMap<String, i64>>,
}

impl Catalog {
    /// Keap's custom fields, read on first use.
    pub(crate) async fn model(
        &self,
        keap: &KeapClient,
        auth: &Auth,
        deadline: Instant,
    ) -> Result<&CustomModel, KeapError> {
        self.model
            .get_or_try_init(|| async {
                let model = keap.contact_model(auth, deadline).await?;
                let fields = model
                    .custom_fields
                    .into_iter()
                    .map(|f| {
                        (
                            f.id,
                            f.label.unwrap_or_default(),
                            f.field_name.unwrap_or_default(),
                            f.field_type.unwrap_or_default(),
                        )
                    })
                    .collect();
                Ok(CustomModel { fields })
            })
            .await
    }

    /// Keap's custom fields if already read.
    pub(crate) fn model_if_known(&self) -> Option<&CustomModel> {
        self.model.get()
    }

    /// The ids of `refs`: ids as given, names looked up (and created if `create` and missing).
    pub(crate) async fn tag_ids(
        &self,
        keap: &KeapClient,
        auth: &Auth,
        refs: &BTreeSet<TagRef>,
        create: bool,
        deadline: Instant,
    ) -> Result<Tags, KeapError> {
        let mut ids = BTreeMap::new();
        let mut missing = Vec::new();
        let mut known = self.tags.lock().await;
        for r in refs {
            let name = match r {
                TagRef::Id(id) => {
                    ids.insert(r.clone(), *id);
                    continue;
                }
                TagRef::Name(name) => name,
            };
            if let Some(id) = known.get(name) {
                ids.insert(r.clone(), *id);
                continue;
            }
            let id = match keap.find_tag(auth, name, deadline).await? {
                Some(id) => id,
                None if create => {
                    let id = keap.create_tag(auth, name, deadline).await?;
                    tracing::info!(tag = %name, id, "created a tag in Keap ([tags] create_missing = true)");
                    id
                }
                None => {
                    missing.push(format!("{name:?}"));
                    continue;
                }
            };
            known.insert(name.clone(), id);
            ids.insert(r.clone(), id);
        }
        Ok(if missing.is_empty() { Tags::Ids(ids) } else { Tags::Missing(missing) })
    }
}
