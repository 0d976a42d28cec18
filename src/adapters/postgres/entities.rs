//! sea-orm entities for the two tables of `migrations/`: rows as the database holds them (`i64`, text),
//! not as the core sees them. The conversions live in the parent module.

/// `requests`: one row per request, every field of [`RequestRecord`](gpu_coordinator_core::RequestRecord).
pub mod request {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub service_id: String,
        pub priority: i16,
        #[sea_orm(unique)]
        pub seq: i64,
        /// `Encoding::as_str`.
        pub encoding: String,
        pub vram_mb: Option<i64>,
        pub gpu_pin: Option<String>,
        pub preemptible: bool,
        pub lease_ms: i64,
        pub requested_at: i64,
        pub timeout_at: i64,
        /// `Phase::as_str`.
        pub phase: String,
        pub gpu: Option<String>,
        pub held_mb: Option<i64>,
        pub fence: Option<i64>,
        pub granted_at: Option<i64>,
        pub expires_at: Option<i64>,
        pub pause_deadline: Option<i64>,
        pub paused_at: Option<i64>,
        pub waited_ms: Option<i64>,
        /// The core's `End`, by `End::as_str` (`end` is a reserved word in SQL).
        pub outcome: Option<String>,
        pub ended_at: Option<i64>,
        pub detail: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `fence`: a single row (`id = 1`) holding the highest fence ever issued.
pub mod fence {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "fence")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub max_fence: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
